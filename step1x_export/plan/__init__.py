"""Device memory of an edit per stage, computed on `meta` from the real configs (`plan.make_plan`)."""
