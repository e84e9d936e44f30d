"""Explain: Grad-CAM, guided backprop and guided Grad-CAM; localisation against radiologists' boxes."""
