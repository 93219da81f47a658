"""The catalog's data: a version's rows, the Annoy index, id maps, zips and images, the head, metrics."""
