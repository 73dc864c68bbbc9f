"""Training helpers: parameter tables and groups, the learning-rate schedule, resumable sampling."""
