"""Pure data work: scanning and validating image folders, captioners, bucketing, caption edits, previews."""
