"""Continual merging: the pool's models arrive one at a time and the merged model is usable after each
arrival, with memory that does not grow with the number of models (``program=continual`` evaluates
after every step; see docs/continual.md)."""
