"""kdmtl's Zarr stores: the prepared dataset and the teacher feature stores.

`manifest` reads a store's validated record, `prepared` and `features` hold each store's layout,
writing and reading, `extract` fills a feature store from a teacher, `checks` inspects and
verifies one, and `stream` turns chunked stores into shuffled training batches.
"""
