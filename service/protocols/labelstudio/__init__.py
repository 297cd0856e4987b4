"""Label Studio ML backend: labelling-config parsing, label mapping, result conversion and task
image fetching. The HTTP routes live in `service.protocols.rest.labelstudio`."""
