"""One merged model, data-free, elementwise or per tensor: averages, task arithmetic, TIES, DARE, breadcrumbs, DELLA, MagMax, Model Stock, SLERP, Karcher, passthrough."""
