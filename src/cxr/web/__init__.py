"""Web: the FastAPI app that serves the page and the REST API over the one Predictor."""
