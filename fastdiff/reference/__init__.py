"""Plain-torch references: the specification of every fastdiff op."""
