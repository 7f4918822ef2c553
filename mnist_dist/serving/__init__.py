"""Serving: the exported model over HTTP, with micro-batching and a page to draw a digit on."""
