"""r1c.passes"""
