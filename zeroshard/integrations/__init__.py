"""Integrations with training frameworks; each module imports its framework, so import
the one you use: ``zeroshard.integrations.hf`` (Hugging Face ``Trainer``)."""
