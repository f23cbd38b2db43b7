"""Reading request bodies of images (multipart or JSON), checked and bounded, for tasks and predictions."""
