"""Optional integrations with other toolkits (detectron2), imported only on request."""
