"""The GGUF output: biases written straight into a GGUF file for llama.cpp, checked in llama.cpp, and control-vector
import."""
