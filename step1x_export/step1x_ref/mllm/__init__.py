"""The Qwen2.5-VL conditioners (v1.0/v1.1 and v1.2), their processor, a tiny Qwen for tests, and v1.2's
thinking and reflection prompts."""
