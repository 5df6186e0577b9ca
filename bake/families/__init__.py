"""Architecture knowledge as data: where each family's residual-stream sites and bias slots live (hf: Hugging Face
families; gguf: llama.cpp's GGUF architectures)."""
