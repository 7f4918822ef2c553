"""Reports: matplotlib pictures and the test-set report of an exported model."""
