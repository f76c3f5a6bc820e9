"""One merged model, data-free, from per-layer SVDs or masks of the task vectors."""
