"""detserve: object-detection model serving."""
