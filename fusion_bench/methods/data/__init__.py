"""One merged model built with training data: Fisher merging, RegMean."""
