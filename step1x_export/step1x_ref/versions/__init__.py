"""What differs between model versions."""
