"""One router per resource: jobs and models."""
