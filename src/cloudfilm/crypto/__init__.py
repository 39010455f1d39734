"""Keys and sealing of secrets the application must be able to read back (TOTP seeds)."""
