"""Code shared by the server and the worker: settings, models, Redis names and the session store."""
