"""`router bench`: the router measured against its upstream, on one machine (runner.py)."""
