"""The DiT: its layers, the connector from the MLLM, RoPE and attention maths."""
