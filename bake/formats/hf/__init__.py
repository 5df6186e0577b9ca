"""The Hugging Face checkpoint output: the bias fold, the constant-bias module (remote code) and unbake."""
