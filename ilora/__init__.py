"""ilora."""
