"""From texts to steering vectors: the texts and tokens that count, activation moments, the vector methods, and
measuring a recipe."""
