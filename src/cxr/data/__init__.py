"""Data: data sets and their labels, patient-disjoint splits, the prepare-once cache, training transforms."""
