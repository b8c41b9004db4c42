"""HTCondor front end: the job wrapper (stdlib only: it runs as the job owner)."""
