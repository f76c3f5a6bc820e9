"""Pure tensor math of the data-using methods (statistics accumulated from activations)."""
