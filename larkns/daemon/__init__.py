"""larknsd: the root daemon that builds jobs' networks and starts jobs in them."""
