"""Images: read a film from PNG, JPEG or DICOM into one grayscale array, with typed, actionable errors."""
