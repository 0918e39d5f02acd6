"""``nijimi serve``: an HTTP server with one resident model, a job queue and A1111's web API (see README)."""
