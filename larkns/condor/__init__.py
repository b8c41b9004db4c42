"""HTCondor front end: the machine ad's cron job, the node's configuration.

The job wrapper and the PREPARE_JOB hook are C (csrc/entry.c).
"""
