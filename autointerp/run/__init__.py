"""`autointerp run` and `autointerp status`: the whole pipeline as one job on the work loop, shared by any number
of workers on one database, kept to a budget; and where a job stands, read without torch."""
