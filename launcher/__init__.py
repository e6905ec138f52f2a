"""`make run`: the embedded Redis and the supervisor that runs the whole service."""
