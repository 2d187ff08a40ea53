"""Integrations with other training tools (each imports its own extra when used).

``fastunlearn.integrations.hf``: a ``transformers.Trainer`` that trains with the unlearning loss
(install ``fastunlearn[hf]``).
"""
