"""Where base models come from: resolving a model spec to a local folder, loading it with stock transformers, the Hub
download and the remote-code trust check."""
