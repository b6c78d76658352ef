"""Photos: safe image loading, the photo health checks (duplicates, dark or blurred photos) and photos handed to Predict."""
