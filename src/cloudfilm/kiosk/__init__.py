"""Self-service printing kiosks: look a patient up by QR code or card, print released
reports, record every print (issue 8 item 5; docs/kiosk-api.md)."""
