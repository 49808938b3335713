"""The two reference servers the harness compares the project server against."""
