"""Diagnostic reports, their PDFs with a QR code, and the document registry."""
