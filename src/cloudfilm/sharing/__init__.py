"""Patient entry tokens (report QR codes, registration labels) and their verification."""
