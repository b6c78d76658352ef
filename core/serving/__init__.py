"""The prediction service: an HTTP server (SageMaker's inference-container contract) over a dynamically batched model."""
