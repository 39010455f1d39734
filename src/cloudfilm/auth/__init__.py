"""Who may call: integration clients (bearer tokens) now; users, roles and sessions later."""
