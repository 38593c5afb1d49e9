"""What only the CLI needs: option parsing and error handling (common), health checks, selection
pictures' data (analysis), speed (speed), the environment report, input files."""
