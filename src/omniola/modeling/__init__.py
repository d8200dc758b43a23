"""Building blocks of the Ola model: vision tower, audio encoders and connectors."""
