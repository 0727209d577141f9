"""Pieces shared by the kernel folders: backend choice."""
