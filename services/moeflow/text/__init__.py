"""Text in and out of a model: tokenizer, chat template, detokenization helpers. No torch."""
